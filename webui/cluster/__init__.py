"""Scale-out on a Ray cluster: generation replicas behind Ray Serve, a LoRA-aware request
router, and the front that serves the same UI and API over them. The only package that
imports `ray` (an optional install: requirements-serve.txt)."""
