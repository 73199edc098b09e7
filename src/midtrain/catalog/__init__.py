"""The catalog stage: every configured dataset source read into one Parquet sample catalog.

The readers of each format live in :mod:`midtrain.data`; this package is the stage that runs them."""
