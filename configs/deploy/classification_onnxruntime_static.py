_base_ = ['./_base_/classification.py', './_base_/backends/onnxruntime.py']
