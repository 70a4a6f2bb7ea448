"""The edge agent: measures registered ONNX candidates on the device. Never imports torch or ray."""
