"""The HTTP front door: KServe v2 REST (kserve.py), ``/v1/classify`` and the draw-a-digit page
(classify.py, page/), on one aiohttp server (server.py) in grpc.aio's event loop."""
