"""The detector as an MLflow model: a pyfunc around detector.Detector, logged by every evaluate run as `detector` with
the thresholds it fitted, and registered as `<method>-<dataset>`.

    import mlflow, numpy as np, pandas as pd
    model = mlflow.pyfunc.load_model("models:/d2dprompt-sample/latest")  # or runs:/<evaluate run id>/detector
    out = model.predict(pd.DataFrame({"image": [open("sample/weave/test/hole/000.png", "rb").read()]}))
    out.loc[0, "score"], out.loc[0, "label"], np.array(out.loc[0, "anomaly_map"])

Input: a column `image` of encoded image files (PNG, JPEG, ...; base64 in a REST request). Output per image: score,
normalized_score (0.5 at the image threshold, detector.Prediction), label, the thresholds and their source, and the anomaly map and predicted mask at evaluate.map_size. Optional
params: image_threshold, pixel_threshold (override the model's), category ('<dataset>/<category>': required by a run
that knows several, as draem, decodiff, patchknn and few-shot d2dprompt).
`mlflow models serve -m models:/d2dprompt-sample/latest --env-manager local` serves it over REST.

This file is the model's code (MLflow's models-from-code: nothing is pickled): MLflow runs it when it loads the model,
with the d2dprompt package the model bundles on the path.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class DetectorModel(PythonModel):
    """Loads the bundled trained folder (artifact `trained`) with the bundled params.yaml (artifact `params`)."""

    def load_context(self, context) -> None:
        from d2dprompt.serve.detector import Detector

        from d2dprompt.trained import read_record

        thresholds = context.artifacts.get("thresholds")
        self.categories = read_record(context.artifacts["trained"])[0].get("categories", [])
        # a run with a model, class label or memory per category loads with its first; `category` picks the one that scores
        first = self.categories[0] if len(self.categories) > 1 else None
        # thresholds may come with each request: a run whose maps are not in [0, 1] is refused per request without them
        self.detector = Detector.load(context.artifacts["trained"], params=context.artifacts["params"], thresholds=thresholds, category=first,
                                      check_scale=False)
        self.by_category: dict[str | None, Detector] = {first: self.detector}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # pd.DataFrame: a hint MLflow accepts without inferring a schema; the logged model carries an explicit signature
        params = params or {}
        category = params.get("category")
        if category is None and len(self.categories) > 1:
            raise ValueError(f"this run knows its categories: pass params={{'category': ...}}, one of {' | '.join(self.categories)}")
        if category not in self.by_category:
            self.by_category[category] = self.detector.for_category(category)
        detector = self.by_category[category]
        if detector.fallback_misreads and (params.get("image_threshold") is None or params.get("pixel_threshold") is None):
            raise ValueError(f"{detector.fallback_misreads}: pass params={{'image_threshold': ..., 'pixel_threshold': ...}}")
        images = [bytes(value) for value in model_input["image"]]
        results = [r.with_thresholds(params.get("image_threshold"), params.get("pixel_threshold")) for r in detector.predict_batch(images)]
        return pd.DataFrame({
            "score": [r.score for r in results],
            "normalized_score": [float("nan") if r.normalized_score is None else r.normalized_score for r in results],
            "label": [r.label for r in results],
            "image_threshold": [r.thresholds.image for r in results],
            "pixel_threshold": [r.thresholds.pixel for r in results],
            "threshold_source": [r.thresholds.source for r in results],
            "anomaly_map": [r.map.tolist() for r in results],
            "mask": [r.map_mask.tolist() for r in results],
        })


mlflow.models.set_model(DetectorModel())
