"""The verification engine: specs in, tests, measurements, verdicts and reports out."""
