"""Serve a trained checkpoint over HTTP with a web page: ``python serve.py ckpt=PATH [port=8000]``."""

from transfer.cli.commands import serve

if __name__ == "__main__":
    serve()
