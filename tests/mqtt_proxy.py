"""TCP proxies on loopback between MQTT clients and a broker.

``PubackProxy`` forwards every byte, except the PUBACKs for the QoS 1
publishes to ``topic`` after the first ``acknowledged``, or for those whose
numbers are in ``withheld``. The
broker still delivers those publishes to its subscribers, so they receive an
update whose PUBACK the publisher never gets, as when the publisher is killed
before the PUBACK arrives.

``DelayProxy`` delays what the broker sends to one client id, as a busy
broker or a slow link does.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

CONNECT = 1
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


def _read_length(data: bytes, index: int) -> tuple[int, int]:
    """Return a variable byte integer at ``index`` and the index after it."""
    value = 0
    for shift in range(0, 28, 7):
        byte = data[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    return value, index


def connect_client_id(packet: bytes) -> str:
    """Return the client id of an MQTT 3.1.1 or 5 CONNECT packet."""
    body = _body(packet)
    name_length = int.from_bytes(body[:2], "big")
    # Protocol name, then protocol level, connect flags and keep alive.
    index = 2 + name_length
    level = body[index]
    index += 4
    if level == 5:
        properties_length, index = _read_length(body, index)
        index += properties_length
    id_length = int.from_bytes(body[index : index + 2], "big")
    return body[index + 2 : index + 2 + id_length].decode()


class DelayProxy:
    """Forward MQTT between clients and the broker on ``broker_port``.

    Every packet that the broker sends after the CONNACK to a client that
    connects as ``client_id`` reaches it ``delay_s`` late. Other clients and
    the packets that clients send are not delayed.

    Attributes:
        port: the port clients connect to.
    """

    def __init__(self, broker_port: int, client_id: str, delay_s: float):
        self.broker_port = broker_port
        self.client_id = client_id
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

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
                target=self._serve, args=(client, broker), daemon=True
            ).start()

    def _serve(self, client: socket.socket, broker: socket.socket) -> None:
        try:
            connect = read_packet(client)
            broker.sendall(connect)
        except OSError:
            client.close()
            broker.close()
            return
        threading.Thread(
            target=_forward, args=(client, broker, 0.0), daemon=True
        ).start()
        delayed = connect[0] >> 4 == CONNECT and (
            connect_client_id(connect) == self.client_id
        )
        _forward(broker, client, self.delay_s if delayed else 0.0)


def _forward(source: socket.socket, target: socket.socket, delay_s: float) -> None:
    """Send each packet from ``source`` to ``target``, all but the first late."""
    # A second thread sends, so that reading goes on while a packet waits.
    due: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
    sender = threading.Thread(target=_send_when_due, args=(due, target), daemon=True)
    sender.start()
    first = True
    try:
        while True:
            packet = read_packet(source)
            due.put((time.monotonic() + (0.0 if first else delay_s), packet))
            first = False
    except OSError:
        pass
    finally:
        due.put(None)
        sender.join()
        source.close()
        target.close()


def _send_when_due(
    due: queue.Queue[tuple[float, bytes] | None], target: socket.socket
) -> None:
    while (item := due.get()) is not None:
        send_at, packet = item
        time.sleep(max(0.0, send_at - time.monotonic()))
        try:
            target.sendall(packet)
        except OSError:
            return
