"""stepzip server package.

Pure method logic lives in plain modules here (steps, compression, grading, data, schemas)
and imports neither vLLM nor FastAPI; the engine-bound parts live in `server.engine` and
`server.routes`, imported only by `server.app`.
"""
