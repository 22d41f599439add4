"""TFX pipeline for PLACE-TF: ingestion, validation, training, evaluation, push."""
