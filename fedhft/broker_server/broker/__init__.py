"""The MQTT broker side, apart from the federated server: an embedded broker for one machine, the production
Mosquitto configuration (listener, password file, ACL), and the device registry of a config directory."""
