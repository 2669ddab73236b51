import type { Transport, TransportKind } from '../src/sdk/transport';

/** An in-memory transport: records what the client sends, lets the test answer. */
export class FakeTransport implements Transport {
  sent: unknown[] = [];
  closed = false;
  onmessage: (data: string | Uint8Array) => void = () => {};
  onclose: (reason: string) => void = () => {};
  constructor(readonly kind: TransportKind = 'websocket', readonly url = 'ws://fake/signal') {}
  send(text: string): void {
    this.sent.push(JSON.parse(text));
  }
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.onclose('closed');
  }
  /** The node sends a message. */
  deliver(msg: unknown): void {
    this.onmessage(JSON.stringify(msg));
  }
  /** The network drops the connection. */
  drop(): void {
    this.close();
  }
}
