"""The core every layer may import: the context the stages share, the config schema, errors, records,
measurement, sizes and dtypes. It imports no stage and nothing of the orchestration."""
