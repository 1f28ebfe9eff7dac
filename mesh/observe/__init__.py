"""What a running mesh shows of its traffic: metrics, access logs, traces."""
