"""`graphflow serve`: the long-lived service — its controller, streams, live feed, REST API, metrics, state store,
previews and dashboard."""
