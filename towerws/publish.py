"""Publishing from Twisted code: the public import path of :class:`towerws.amqp.publisher.Publisher`.

::

    from towerws.publish import Publisher, PublishError

See :mod:`towerws.amqp.publisher` for the whole story.
"""

from towerws.amqp.publisher import Publisher
from towerws.bus import PublishError

__all__ = ["Publisher", "PublishError"]
