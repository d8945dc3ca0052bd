"""The shared core every method and stage stands on: `data` (images, manifests, latents, synthetic anomalies),
`eval` (metrics, thresholds, map post-processing, reports), `runtime` (params, outputs, checkpoints, tracking,
processes), the frozen Stable Diffusion parts (`models`) and the one training loop (`training`). Pure: no stage,
method or serving code is imported from here."""
