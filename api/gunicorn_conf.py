"""gunicorn settings shared by `make run`, docker-compose and the Dockerfile (``-c python:...``).

The request-head limits sit above the app's own (api/errors.py), so an over-long
target or header block is answered by the app in the dialect's JSON shape rather
than by gunicorn's HTML page. 8190 is the most gunicorn allows for a request line
short of "unlimited", which it would read into memory without bound.
"""

limit_request_line = 8190
limit_request_fields = 200
limit_request_field_size = 32 * 1024
