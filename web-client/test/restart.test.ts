// When the SDK restarts ICE (src/sdk/restart.ts), with time as an argument; and the
// Room doing it against a scripted node: a dead path with signaling up gets an ICE
// restart on the same participant, not a rejoin.
import { afterEach, describe, expect, it } from 'vitest';
import { IceRestartWatch, Room, type Transport } from '../src/sdk';
import { FakePeerConnection, FakeStream, FakeTrack, FakeTransport } from './fakes';

const POLICY = { disconnectedMs: 2000, retryMs: 5000, maxRestarts: 2 };

describe('IceRestartWatch', () => {
  it('does nothing for a connection that never connected', () => {
    const w = new IceRestartWatch(POLICY);
    w.onState('checking', 0);
    w.onState('failed', 100);
    expect(w.decide(60_000, true)).toBe('none');
  });

  it('restarts after disconnectedMs of `disconnected`, and only with signaling up', () => {
    const w = new IceRestartWatch(POLICY);
    w.onState('connected', 0);
    w.onState('disconnected', 1000);
    expect(w.decide(2999, true)).toBe('none');
    expect(w.decide(3000, false)).toBe('none');
    expect(w.decide(3000, true)).toBe('restart');
  });

  it('restarts at once on `failed`', () => {
    const w = new IceRestartWatch(POLICY);
    w.onState('completed', 0);
    w.onState('failed', 500);
    expect(w.decide(500, true)).toBe('restart');
  });

  it('a path that comes back by itself needs no restart', () => {
    const w = new IceRestartWatch(POLICY);
    w.onState('connected', 0);
    w.onState('disconnected', 1000);
    w.onState('connected', 1500);
    expect(w.decide(10_000, true)).toBe('none');
  });

  it('retries every retryMs while the path stays dead, then gives up for a rejoin', () => {
    const w = new IceRestartWatch(POLICY);
    w.onState('connected', 0);
    w.onState('disconnected', 0);
    expect(w.decide(2000, true)).toBe('restart');
    w.restarted(2000);
    w.onState('checking', 2100);
    expect(w.decide(6999, true)).toBe('none');
    expect(w.decide(7000, true)).toBe('restart');
    w.restarted(7000);
    expect(w.decide(12_000, true)).toBe('rejoin');
  });

  it('a restart that worked starts the count again', () => {
    const w = new IceRestartWatch(POLICY);
    w.onState('connected', 0);
    w.onState('failed', 0);
    w.restarted(0);
    w.onState('connected', 1000);
    w.onState('failed', 20_000);
    expect(w.decide(20_000, true)).toBe('restart');
    expect(w.restarts).toBe(0);
  });
});

type Msg = Record<string, unknown>;

/** A node that answers join, offers (echoing announced tracks) and `ice_restart`. */
function scriptedNode() {
  const sent: Msg[] = [];
  let joins = 0;
  let last: FakeTransport | undefined;
  const factory = async (): Promise<Transport> => {
    const t = new FakeTransport();
    last = t;
    t.respond = (m) => {
      sent.push(m);
      if (m.type === 'join') {
        joins++;
        t.deliver({ type: 'joined', participant_id: 'PA_1', room: 'demo', participants: [], resume: 'r', resume_grace_secs: 10, version: 1, restored: false });
      } else if (m.type === 'offer') {
        const tracks = (m.tracks as Msg[]).map((a, i) => ({ track_id: `TR_${i}`, participant_id: 'PA_1', mid: a.mid, kind: a.kind, source: a.source, layers: [], muted: false }));
        t.deliver({ type: 'answer', sdp: 'v=0\r\nnode-answer', tracks });
      } else if (m.type === 'ice_restart') {
        t.deliver({ type: 'offer', sdp: 'v=0\r\na=mid:0\r\na=ice-ufrag:new', tracks: [{ mid: '0', track_id: 'TB_cam', participant_id: 'PB_1' }] });
      }
    };
    return t;
  };
  return { sent, factory, joins: () => joins, last: () => last };
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
async function until(cond: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await tick(5);
  }
}

let rooms: Room[] = [];
afterEach(() => {
  for (const r of rooms) r.leave();
  rooms = [];
  FakePeerConnection.all = [];
});

function makeRoom(node: ReturnType<typeof scriptedNode>): Room {
  const cam = new FakeStream([new FakeTrack('audio'), new FakeTrack('video')]);
  const room = new Room({
    token: 't',
    nodes: [{ httpOrigin: 'http://node.test' }],
    transportFactory: node.factory,
    rtc: {
      createPeerConnection: (c) => new FakePeerConnection(c) as unknown as RTCPeerConnection,
      getUserMedia: async () => cam as unknown as MediaStream,
      getDisplayMedia: async () => cam as unknown as MediaStream,
      webTransport: false,
    },
    policy: { baseMs: 1, maxMs: 4, jitter: 0, maxAttempts: 3, initialAttempts: 2, maxRedirects: 3 },
    speakerIntervalMs: 0,
    probeIntervalMs: 0,
    iceRestart: { disconnectedMs: 0, retryMs: 60_000 },
  });
  rooms.push(room);
  return room;
}

describe('Room ICE restart', () => {
  it('a connection that never came up and fails still joins afresh (no path to restart)', async () => {
    const node = scriptedNode();
    const room = makeRoom(node);
    await room.connect();
    await until(() => room.ownTracks().length === 2);
    (room.pub as unknown as FakePeerConnection).fail();
    await until(() => node.joins() === 2);
    expect(node.sent.some((m) => m.type === 'leave')).toBe(true);
    expect(room.iceRestarts).toBe(0);
  });

  it('restarts ICE on both connections when their paths die with signaling up, on the same participant', async () => {
    const node = scriptedNode();
    const room = makeRoom(node);
    await room.connect();
    await until(() => room.ownTracks().length === 2);
    const own = room.ownTracks();
    const pub = room.pub as unknown as FakePeerConnection;
    pub.setIce('connected');
    pub.setIce('disconnected');
    await until(() => node.sent.filter((m) => m.type === 'offer').length === 2);
    const restartOffer = node.sent.filter((m) => m.type === 'offer')[1];
    expect(restartOffer?.tracks, 'an ICE restart announces no tracks').toEqual([]);
    expect(pub.iceRestarts).toBe(1);
    await until(() => pub.remoteDescription !== null);
    expect(room.ownTracks(), 'the own tracks stay').toEqual(own);

    // Subscriber side: the first node offer makes the connection; its path dies.
    const answers = () => node.sent.filter((m) => m.type === 'answer').length;
    node.last()?.deliver({ type: 'offer', sdp: 'v=0\r\na=mid:0', tracks: [{ mid: '0', track_id: 'TB_cam', participant_id: 'PB_1' }] });
    await until(() => answers() === 1);
    const sub = room.sub as unknown as FakePeerConnection;
    sub.setIce('connected');
    sub.setIce('failed');
    await until(() => answers() === 2);
    expect(node.sent.filter((m) => m.type === 'ice_restart')).toHaveLength(1);
    expect(room.sub, 'the same subscriber connection').toBe(sub as unknown as RTCPeerConnection);
    expect(sub.remoteDescription?.sdp).toContain('ice-ufrag:new');
    expect(room.iceRestarts).toBe(2);
    expect(room.participantId).toBe('PA_1');
    expect(node.joins(), 'no rejoin').toBe(1);
    expect(node.sent.some((m) => m.type === 'leave')).toBe(false);
  });
});
