// How the official JavaScript Speech SDK reads and writes USP text messages, by its own code
// (WebsocketMessageFormatter): for the relay's differential tests of its USP reader.
// stdin: one JSON line per case, {"read": "<message>"} or {"write": {"headers": {...}, "body": "..."}};
// stdout: one JSON line per case, {"headers": {...}, "body": ...} as the SDK read it, or {"text": ...}
// as it wrote it.
"use strict";
const readline = require("readline");
const base = "microsoft-cognitiveservices-speech-sdk/distrib/lib/src";
const { WebsocketMessageFormatter } = require(`${base}/common.speech/WebsocketMessageFormatter.js`);
const { ConnectionMessage, MessageType, RawWebsocketMessage } = require(`${base}/common/Exports.js`);

const formatter = new WebsocketMessageFormatter();
const lines = readline.createInterface({ input: process.stdin });
(async () => {
  for await (const line of lines) {
    const job = JSON.parse(line);
    if (job.read !== undefined) {
      const read = await formatter.toConnectionMessage(new RawWebsocketMessage(MessageType.Text, job.read));
      console.log(JSON.stringify({ headers: read.headers, body: read.textBody }));
    } else {
      const message = new ConnectionMessage(MessageType.Text, job.write.body, job.write.headers);
      const written = await formatter.fromConnectionMessage(message);
      console.log(JSON.stringify({ text: written.textContent }));
    }
  }
})();
