"""The HTTP ingress, split by concern: `routes` (the FastAPI routes and the `Ingress` deployment, which wires the
rest), `request_path` (the one orchestrator of a request: user state -> retrieval -> ranking -> policy), `routing`
(live versions, their handles and the sticky weighted split), `admin` (the policy registry and its steering) and
`metrics` (what the ingress exports about the answers it served)."""
