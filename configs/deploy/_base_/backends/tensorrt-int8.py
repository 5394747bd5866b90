# TensorRT INT8 (with fp16 where INT8 has no kernel), calibrated by mmdeploy
# on the model config's validation images (written to calib_data.h5).
_base_ = ['./tensorrt.py']
backend_config = dict(common_config=dict(fp16_mode=True, int8_mode=True))
calib_config = dict(create_calib=True, calib_file='calib_data.h5')
