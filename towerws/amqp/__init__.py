"""The AMQP wing: the node's RabbitMQ connection, its queue and bindings, and publishing over txAMQP.

It never imports the websocket wing (:mod:`towerws.websocket`); what both need
lives at the top of the package (:mod:`towerws.bus`, :mod:`towerws.messages`,
:mod:`towerws.hub`, ...).  ``tests/test_layout.py`` checks it.
"""
