"""The HTTP edge: the FastAPI app, its routes, request/response schemas, errors, auth and
middleware, and the state the lifespan loads. The only wing that imports FastAPI."""
