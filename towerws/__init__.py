"""towerws: live-update websocket server for Ansible Tower / AWX, fed by RabbitMQ."""

__version__ = "0.1.0"
