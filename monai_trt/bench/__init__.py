"""`python -m monai_trt bench` (optional extra `bench`): PyTorch against every engine on this machine, with reports.

Nothing outside this package imports it at module level; its plotting/statistics dependencies stay out of the core.
"""
