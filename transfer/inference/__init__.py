"""After training: one inference loop (Lightning's ``Trainer.predict``) for evaluate, predict and
cross-validation; saliency maps; export to ONNX, INT8, TorchScript and timm; the HTTP server; reports."""
