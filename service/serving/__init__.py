"""Images in, embeddings out: decoding untrusted images, dynamic batching, the served ONNX
Runtime encoders (bundled and users'), and validating users' uploaded models."""
