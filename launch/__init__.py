"""Job submission to Vertex AI and TPU VMs (see README.md)."""
