"""Networks: 3D volume encoders from MONAI (`volume_encoders`), the time-series encoder
(`ts_encoder`), the EMA teacher (`ema`) and projection heads (`heads`). Submodules are imported
explicitly, so importing `medssl.models` does not pull in MONAI."""
