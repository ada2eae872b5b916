"""The service over a Ray cluster: a front that places streams on replicas (one per node), and their metrics."""
