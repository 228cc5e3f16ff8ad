"""Batch personalization on Ray: requests, training jobs and the artifact store."""
