_base_ = ['./classification.py']
onnx_config = dict(dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})
