"""The methods, one folder each (d2dprompt/, d2d/, anomalyclip/, draem/, decodiff/): its pure torch model, loss,
training and batch scoring. base.py says what a method is, registry.py maps names to methods; the stages, predict,
the Python API, the web app and the MLflow model reach a method only through the registry. prompt_learner.py is the
learnable-prompt building block the prompt methods share."""
