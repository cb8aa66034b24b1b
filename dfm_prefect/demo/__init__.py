"""The federated climate demo: synthetic data on two sites, one local and one on S3."""
