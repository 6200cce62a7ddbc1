// The test page: one matrix-js-sdk client (with its Rust crypto, as in Element Web) per tab,
// driven step by step by run-test.mjs through `window.t`. Every step throws on failure.
import * as sdk from "matrix-js-sdk";

let client = null;
const log = (...args) => console.log("[page]", ...args);

/** Polls `check` every 100 ms until it returns a truthy value, or throws after `ms`. */
async function until(what, ms, check) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Registers `username` through the m.login.dummy UIAA flow, as Element does on a server without captcha/email. */
async function register(baseUrl, username, password) {
  const anon = sdk.createClient({ baseUrl });
  let session;
  try {
    await anon.registerRequest({ username, password });
    throw new Error("first /register should have answered 401 with a UIAA session");
  } catch (e) {
    if (e.httpStatus !== 401) throw e;
    session = e.data?.session;
  }
  return anon.registerRequest({
    username,
    password,
    initial_device_display_name: "outpost browser test",
    auth: { type: "m.login.dummy", session },
  });
}

function room(roomId) {
  const r = client.getRoom(roomId);
  if (!r) throw new Error(`unknown room ${roomId}`);
  return r;
}

window.t = {
  /** Registers, then logs in with the password (a second device, like a fresh Element session). */
  async login(baseUrl, username, password) {
    await register(baseUrl, username, password);
    const anon = sdk.createClient({ baseUrl });
    const login = await anon.loginRequest({
      type: "m.login.password",
      identifier: { type: "m.id.user", user: username },
      password,
      initial_device_display_name: "outpost browser test (login)",
    });
    client = sdk.createClient({
      baseUrl,
      userId: login.user_id,
      accessToken: login.access_token,
      deviceId: login.device_id,
    });
    log("logged in", login.user_id, login.device_id);
    return { userId: login.user_id, deviceId: login.device_id };
  },

  /** Starts the Rust crypto and the sync loop, as Element does after login; resolves once the first sync is in. */
  async startSync() {
    await client.initRustCrypto({ useIndexedDB: false });
    const prepared = new Promise((resolve, reject) => {
      client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
        if (state === "PREPARED" || state === "SYNCING") resolve();
        if (state === "ERROR") reject(new Error(`sync error: ${data?.error}`));
      });
    });
    await client.startClient({ initialSyncLimit: 20, lazyLoadMembers: true });
    await prepared;
    document.getElementById("status").textContent = `syncing as ${client.getUserId()}`;
    log("syncing");
  },

  /** Creates an encrypted DM with `other` the way Element does (is_direct invite, m.room.encryption, m.direct). */
  async createEncryptedDm(other) {
    const { room_id } = await client.createRoom({
      preset: sdk.Preset.TrustedPrivateChat,
      is_direct: true,
      invite: [other],
      initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
    });
    await client.setAccountData(sdk.EventType.Direct, { [other]: [room_id] });
    await until("the room in sync", 20000, () => client.getRoom(room_id));
    log("created DM", room_id);
    return room_id;
  },

  /** Waits for an invite, checks it is a direct one, joins. */
  async acceptInvite() {
    const r = await until("an invite", 30000, () =>
      client.getRooms().find((r) => r.getMyMembership() === sdk.KnownMembership.Invite),
    );
    const me = r.getMember(client.getUserId());
    const isDirect = me?.events?.member?.getContent()?.is_direct === true;
    await client.joinRoom(r.roomId);
    await until("own join in sync", 20000, () => room(r.roomId).getMyMembership() === sdk.KnownMembership.Join);
    log("joined", r.roomId, "direct:", isDirect);
    return { roomId: r.roomId, isDirect };
  },

  async waitMember(roomId, userId, membership) {
    await until(`${userId} to be ${membership} in ${roomId}`, 30000, () => room(roomId).getMember(userId)?.membership === membership);
  },

  async isEncrypted(roomId) {
    return client.getCrypto().isEncryptionEnabledInRoom(roomId);
  },

  async send(roomId, body) {
    const { event_id } = await client.sendMessage(roomId, { msgtype: "m.text", body });
    log("sent", event_id);
    return event_id;
  },

  /** Waits until a message with `body` is in the room's live timeline, decrypted; returns how it arrived. */
  async waitMessage(roomId, body) {
    const ev = await until(`message "${body}"`, 60000, async () => {
      const events = room(roomId).getLiveTimeline().getEvents();
      for (const e of events) {
        if (e.isEncrypted()) await client.decryptEventIfNeeded(e);
      }
      return events.find((e) => e.getType() === "m.room.message" && e.getContent().body === body);
    });
    return {
      sender: ev.getSender(),
      wireType: ev.getWireType(),
      encrypted: ev.isEncrypted(),
      decryptionFailure: ev.isDecryptionFailure(),
      algorithm: ev.getWireContent().algorithm ?? null,
    };
  },

  /** Uploads a generated PNG as Element does for an image message (uploadContent). */
  async uploadImage() {
    const canvas = new OffscreenCanvas(300, 200);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#3a7";
    ctx.fillRect(0, 0, 300, 200);
    ctx.fillStyle = "#a37";
    ctx.fillRect(50, 50, 100, 100);
    const blob = await canvas.convertToBlob({ type: "image/png" });
    const { content_uri } = await client.uploadContent(blob, { name: "square.png", type: "image/png" });
    return { contentUri: content_uri, size: blob.size };
  },

  /** Fetches an mxc:// URI (download or thumbnail) over authenticated media, cross-origin with a Bearer token, as Element's service worker does. */
  async fetchMedia(mxc, width, height) {
    const url = width
      ? client.mxcUrlToHttp(mxc, width, height, "crop", false, true, true)
      : client.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, true);
    const res = await fetch(url, { headers: { Authorization: `Bearer ${client.getAccessToken()}` } });
    const blob = await res.blob();
    let dims = null;
    if (res.ok && blob.type.startsWith("image/")) {
      const bmp = await createImageBitmap(blob);
      dims = [bmp.width, bmp.height];
    }
    return { url, status: res.status, type: blob.type, size: blob.size, dims };
  },

  async stop() {
    client?.stopClient();
  },
};

document.getElementById("status").textContent = "ready";
