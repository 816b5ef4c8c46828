"""deployments/ owns the Ray Serve applications: the HTTP ingress with routing and policy, one pipeline app per model
version (retrieval, ranking), the online feature store front, and the builders that wire them."""
