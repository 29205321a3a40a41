"""Self-supervised pretraining: views with known geometry, anatomical matchers, batch datasets, tasks."""
