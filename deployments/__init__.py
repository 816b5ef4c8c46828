"""deployments/ owns the Ray Serve applications: the HTTP ingress (routes, the request path, version routing, admin
steering, metrics), each version's stages (Retrieval, Ranking, Version), the online store, and the app builders.
Each deployment is thin: it builds a core of `training.request` in `__init__` and forwards to it."""
