"""End-to-end tests against a real ComfyUI (opt-in: COMFYUI_DIR). A package, so that its conftest.py
does not take the place of tests/conftest.py, which the other tests import as `conftest`."""
