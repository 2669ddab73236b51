// A small typed event emitter (no DOM): `on` returns the function that unsubscribes.

/** Listeners by event name; `Events` maps each name to its payload type. */
export class Emitter<Events extends object> {
  private readonly listeners = new Map<keyof Events, Set<(value: never) => void>>();

  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as (value: never) => void);
    return () => { set?.delete(listener as (value: never) => void); };
  }

  /** Calls every listener of `event`; a throwing listener does not stop the others. */
  emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const l of [...(this.listeners.get(event) ?? [])]) {
      try {
        (l as (value: Events[K]) => void)(value);
      } catch (e) {
        console.error(`listener of ${String(event)} failed`, e);
      }
    }
  }
}
