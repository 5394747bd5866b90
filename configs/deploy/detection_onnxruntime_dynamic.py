_base_ = ['./_base_/detection_dynamic.py', './_base_/backends/onnxruntime.py']
