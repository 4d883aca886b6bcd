-- Providers' delivery reports name a message by the provider's id: WhatsApp by its wamid,
-- bounce emails by the original Message-ID. Only those channels are looked up that way (Twilio
-- callbacks carry a signed token naming the message), so the index stays small.
CREATE INDEX messages_provider_id ON messages (app_id, provider_message_id)
    WHERE provider_message_id <> '' AND channel IN ('email', 'whatsapp');
