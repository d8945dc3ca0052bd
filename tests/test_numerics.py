"""core/runtime/numerics.py: what the stages pin, what they record, and that the pin reaches the kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from d2dprompt.core.runtime import numerics


def test_portable_overrides_what_the_environment_asked_for_and_native_leaves_it():
    asked = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    environ = dict(asked)
    assert numerics.pin(environ) == "portable"
    assert environ == {**asked, **numerics.PORTABLE}
    environ = {**asked, "D2D_CPU": "native"}
    assert numerics.pin(environ) == "native"
    assert environ == {**asked, "D2D_CPU": "native"}


def test_an_unknown_setting_is_refused_in_one_line():
    with pytest.raises(numerics.NumericsError, match=r"^D2D_CPU='avx512': must be one of portable, native$"):
        numerics.pin({"D2D_CPU": "avx512"})


def test_a_stage_process_runs_the_pinned_kernels_and_threads_whatever_the_environment():
    code = ("import d2dprompt.pipeline, json, torch; from d2dprompt.core.runtime import numerics; numerics.fix_threads(); "
            "print(json.dumps(numerics.record()))")
    env = {"PATH": "/usr/bin:/bin", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE",
           "OPENBLAS_CORETYPE": "Prescott"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    record = json.loads(out)
    assert record["aten_kernels"] == "AVX2" and record["threads"] == "2" and record["mkl_cbwr"] == "AVX2"
    assert record["openblas"] == "Haswell" and record["faiss"] == "avx2"
    assert all(isinstance(v, str) for v in record.values())  # strings: dvc metrics show leaves them out of its columns
    native = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "D2D_CPU": "native"}, check=True)
    assert json.loads(native.stdout)["aten_kernels"] == "DEFAULT" and json.loads(native.stdout)["threads"] == "1"


def test_the_cpu_model_and_its_kernel_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse2 avx2 fma avx512f\n\nprocessor\t: 1\n")
    assert numerics.cpu_model(info) == ("Some CPU 9000", ["avx2", "fma", "avx512f"])
    assert numerics.cpu_model(tmp_path / "absent")[1] == []
    tags = numerics.machine_tags()
    assert {"machine.cpu", "machine.cpu_flags", "numerics.aten_kernels", "numerics.threads", "numerics.torch"} <= set(tags)
