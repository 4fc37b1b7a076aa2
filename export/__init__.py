"""Turn a Hugging Face text classifier into a validated, quantized ONNX model folder."""
