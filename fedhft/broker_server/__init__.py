"""Broker-side federated logic (numpy only, torch-free): masked LoRA aggregation and re-factoring
(aggregation, svd), aggregation strategies (strategies/), client clustering, the coordinator (federation),
its state store and the MQTT service, and the embedded broker."""
