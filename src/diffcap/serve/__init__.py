"""`diffcap serve`: a trained run behind a web page and an HTTP API, with batching and upload limits.

Needs the serve extra (``pip install -e ".[serve]"``): gradio, fastapi, uvicorn, python-multipart.
"""
