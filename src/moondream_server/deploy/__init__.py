"""Deployment helpers: container health check, model prefetch (baking) and the Ray Serve app.

``ray_serve`` needs the optional ``ray`` extra (``pip install "moondream-server[ray]"``); the other
modules use only the base dependencies.
"""
