"""Prediction service: churn (XGBoost), ticket and revenue forecasts, anomaly alerts,
and the model registry. See docs/prediction.md; figures in docs/benchmarks-prediction.md."""
