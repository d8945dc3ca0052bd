"""Reading data: images and masks, dataset manifests and converters, the latents store, synthetic anomalies."""
