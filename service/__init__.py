"""The service, in wings whose arrows run one way (tests/test_layers.py holds them):

    main.py (uvicorn)  ->  api/  ->  jobs/  ->  storage/, serving/  ->  settings, exceptions,
    worker.py (Celery) ->  jobs/                                        names, metrics

`api/` is HTTP (FastAPI, only there); `serving/` turns images into embeddings (ONNX Runtime);
`storage/` keeps galleries, jobs, heads and reports in the data directory; `jobs/` runs the long
work (PyTorch, only in workers). Below the API, refusals are the exceptions of `exceptions.py`.
"""
