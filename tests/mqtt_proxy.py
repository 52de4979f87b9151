"""A TCP proxy on loopback that withholds the broker's PUBACKs for one topic.

It forwards every byte between MQTT clients and a broker, except the PUBACKs
for the QoS 1 publishes to ``topic`` after the first ``acknowledged``, or
for those whose numbers are in ``withheld``. The
broker still delivers those publishes to its subscribers, so they receive an
update whose PUBACK the publisher never gets, as when the publisher is killed
before the PUBACK arrives.
"""

from __future__ import annotations

import socket
import threading

PUBLISH = 3
PUBACK = 4


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def read_packet(sock: socket.socket) -> bytes:
    """Read one whole MQTT control packet: fixed header, length and body."""
    header = _read_exactly(sock, 1)
    length = 0
    length_bytes = b""
    for shift in range(0, 28, 7):
        byte = _read_exactly(sock, 1)
        length_bytes += byte
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
    return header + length_bytes + _read_exactly(sock, length)


def _body(packet: bytes) -> bytes:
    index = 1
    while packet[index] & 0x80:
        index += 1
    return packet[index + 1 :]


class PubackProxy:
    """Forward MQTT between clients and the broker on ``broker_port``.

    Attributes:
        port: the port clients connect to.
        acknowledged: how many publishes to ``topic`` get their PUBACK
            forwarded; None forwards every PUBACK.
        withheld: the numbers, from 1, of the publishes to ``topic`` whose
            PUBACK is withheld, whatever ``acknowledged`` is.
    """

    def __init__(
        self,
        broker_port: int,
        topic: str,
        acknowledged: int | None,
        withheld: frozenset[int] = frozenset(),
    ):
        self.broker_port = broker_port
        self.topic = topic.encode()
        self.acknowledged = acknowledged
        self.withheld = withheld
        self.publishes = 0
        self._held: set[int] = set()
        # The withheld PUBACKs, with the client socket each was meant for.
        self._withheld_pubacks: list[tuple[socket.socket, bytes]] = []
        self._lock = threading.Lock()
        # Serializes the writes to a client of the pump and of release_held.
        self._send_lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def forward_all(self) -> None:
        """Forward every PUBACK from now on, also for later publishes to topic."""
        with self._lock:
            self.acknowledged = None
            self.withheld = frozenset()
            self._held.clear()

    def release_held(self) -> None:
        """Forward every PUBACK from now on, and send those withheld so far."""
        self.forward_all()
        with self._lock:
            pubacks, self._withheld_pubacks = self._withheld_pubacks, []
        with self._send_lock:
            for client, packet in pubacks:
                client.sendall(packet)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.broker_port))
            self._sockets += [client, broker]
            threading.Thread(
                target=self._pump,
                args=(client, broker, self._watch_publish),
                daemon=True,
            ).start()
            threading.Thread(
                target=self._pump,
                args=(broker, client, self._puback_check(client)),
                daemon=True,
            ).start()

    def _pump(self, source: socket.socket, target: socket.socket, check) -> None:
        try:
            while True:
                packet = read_packet(source)
                if check(packet):
                    with self._send_lock:
                        target.sendall(packet)
        except OSError:
            pass
        finally:
            source.close()
            target.close()

    def _watch_publish(self, packet: bytes) -> bool:
        """Note the packet id of each QoS 1 publish to topic past the allowance."""
        if packet[0] >> 4 != PUBLISH or (packet[0] >> 1) & 3 != 1:
            return True
        body = _body(packet)
        topic_length = int.from_bytes(body[:2], "big")
        if body[2 : 2 + topic_length] != self.topic:
            return True
        packet_id = int.from_bytes(body[2 + topic_length : 4 + topic_length], "big")
        with self._lock:
            self.publishes += 1
            if self.acknowledged is not None and self.publishes > self.acknowledged:
                self._held.add(packet_id)
            if self.publishes in self.withheld:
                self._held.add(packet_id)
        return True

    def _puback_check(self, client: socket.socket):
        """Return the check of the packets from the broker to ``client``."""

        def pass_puback(packet: bytes) -> bool:
            if packet[0] >> 4 != PUBACK:
                return True
            packet_id = int.from_bytes(_body(packet)[:2], "big")
            with self._lock:
                if packet_id not in self._held:
                    return True
                self._withheld_pubacks.append((client, packet))
                return False

        return pass_puback
