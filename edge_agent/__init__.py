"""The edge agent: measures registered ONNX candidates on the device (issue 5). Never imports torch or ray."""
