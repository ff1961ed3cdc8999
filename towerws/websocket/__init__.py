"""The websocket wing: the browser-facing protocol and factory, the HTTP listener and its resources.

It never imports the AMQP wing (:mod:`towerws.amqp`) and never loads txAMQP;
what both need lives at the top of the package (:mod:`towerws.bus`,
:mod:`towerws.messages`, :mod:`towerws.hub`, ...).  ``tests/test_layout.py``
checks it.
"""
