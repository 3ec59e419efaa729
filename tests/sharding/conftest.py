import os

# multi_device/ needs 8 CPU devices, which must be set before JAX starts: test_multi_device.py
# runs it in its own pytest process (PIGJAX_MULTI_DEVICE=1).
collect_ignore = [] if os.environ.get("PIGJAX_MULTI_DEVICE") == "1" else ["multi_device"]
